from localqwen.cli import main

main()
