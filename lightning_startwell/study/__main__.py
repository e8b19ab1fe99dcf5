from lightning_startwell.study.cli import main

main()
