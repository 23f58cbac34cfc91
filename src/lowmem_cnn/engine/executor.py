"""Work split over the threads: the one way lowmem-cnn runs things in parallel."""

from lowmem_cnn.engine.blas import single_threaded


def run_shared(pool, threads: int, work, parts: list) -> list:
    """work(part, thread index) for each part, the parts dealt to the threads in turn;
    the results in the parts' order.

    The calling thread is thread 0 and takes the first share itself rather than wait
    idle (about 5% of an epoch, measured); `pool` runs the other threads - 1 shares.
    Each thread's BLAS runs single-threaded meanwhile (see blas.py).
    """
    with single_threaded():
        if pool is None or threads == 1:
            return [work(part, 0) for part in parts]
        chunks = [parts[t::threads] for t in range(threads)]
        futures = [pool.submit(lambda chunk, t: [work(p, t) for p in chunk], chunk, t)
                   for t, chunk in enumerate(chunks) if t]
        results = [[work(p, 0) for p in chunks[0]]] + [future.result() for future in futures]
    return [results[i % threads][i // threads] for i in range(len(parts))]
