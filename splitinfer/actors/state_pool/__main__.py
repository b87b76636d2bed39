from splitinfer.actors.state_pool.actor import main

main()
