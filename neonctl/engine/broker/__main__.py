from neonctl.engine.broker.service import main

main()
