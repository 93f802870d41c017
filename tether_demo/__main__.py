from tether_demo.server import main

main()
