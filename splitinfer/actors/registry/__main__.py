from splitinfer.actors.registry.actor import main

main()
