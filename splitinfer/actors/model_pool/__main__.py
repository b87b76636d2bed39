from splitinfer.actors.model_pool.actor import main

main()
