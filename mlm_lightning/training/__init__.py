"""What a fit needs beside the module and the data: checkpoint policy, graceful stop, progress, throughput, plots."""
