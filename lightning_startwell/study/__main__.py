from lightning_startwell.study.cli import main

if __name__ == "__main__":
    main()
