from edgesqz.cli import main

main()
