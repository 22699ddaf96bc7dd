from mpc_rec.cli import main

main()
