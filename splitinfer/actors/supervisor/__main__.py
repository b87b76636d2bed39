from splitinfer.actors.supervisor.supervisor import main

main()
