"""splitinfer: split Keras models and run them across device, edge and cloud over RabbitMQ."""

__version__ = "0.1.0"
