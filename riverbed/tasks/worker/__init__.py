"""The task worker: fetches leased tasks in batches and runs them in a thread, async or process
pool."""
