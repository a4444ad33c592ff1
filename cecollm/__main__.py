from cecollm.cli import main

main()
