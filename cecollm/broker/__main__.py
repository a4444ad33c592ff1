"""`python -m cecollm.broker ...` is `cecollm-broker ...`."""

from cecollm.broker.cli import main

if __name__ == "__main__":
    main()
