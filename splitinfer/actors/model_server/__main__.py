from splitinfer.actors.model_server.actor import main

main()
