"""Getting records to a sink exactly once: batching and retries
(:mod:`lapse.delivery.batches`), the run ledger and locks
(:mod:`lapse.delivery.ledger`) and the audit snapshots (:mod:`lapse.delivery.audit`)."""
