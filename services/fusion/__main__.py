from services.fusion.main import main

main()
