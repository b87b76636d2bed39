from splitinfer.actors.result_store.actor import main

main()
