"""`python -m lowmem_cnn` and the `lowmem-cnn` command. Ctrl-C while the command line
is still importing (NumPy, click: about 0.3 s) is one line and status 130, as it is
later, not a traceback."""

import sys


def run():
    try:
        from lowmem_cnn.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("lowmem-cnn: stopped by SIGINT while starting\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
