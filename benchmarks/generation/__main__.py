from benchmarks.generation.run import main

main()
