from neonctl.engine.proxy.service import main

main()
