from llmos_cli.cli import main

main()
