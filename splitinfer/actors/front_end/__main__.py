from splitinfer.actors.front_end.actor import main

main()
