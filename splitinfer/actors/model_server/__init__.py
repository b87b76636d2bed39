"""Model server: serves parts of deployments over `<ns>.tensors`. `hosted` (one hosted part's state), `joins`
(gathering a request's inputs), `batching` (ready requests, one call per batch), `runner` (TensorFlow: threads,
load and warm up, emulated slowdown), `actor` (the process: `python -m splitinfer.actors.model_server`), `client`
(load and unload orders)."""
