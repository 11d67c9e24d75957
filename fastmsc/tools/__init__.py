"""Developer tools that the library itself never imports: ``python -m fastmsc.tools.aot`` compiles every Triton
kernel ahead of time and checks its registers, spills and shared memory."""
