from splitinfer.actors.optimizer.actor import main

main()
