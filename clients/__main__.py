from kernelmesh.clients.cli import main

main()
