"""The root/worker machinery every front end shares: start-up, the engine step loop, and the
sequences it runs (generation; the scheduler)."""
