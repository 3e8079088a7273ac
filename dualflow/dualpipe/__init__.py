"""Pipeline schedules as data (1F1B, ZB1P, interleaved, DualPipe, DualPipeV), simulator, rendering, runtime."""
