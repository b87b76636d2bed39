from splitinfer.cli import main

main()
