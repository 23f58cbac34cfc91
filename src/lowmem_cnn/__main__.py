from lowmem_cnn.cli import main

main()
