from extras.sweep.search import main

main()
