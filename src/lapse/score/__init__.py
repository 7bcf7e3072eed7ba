"""The score jobs: records from a model (:mod:`lapse.score.records`), the nightly run
that delivers them (:mod:`lapse.score.run`), and the incremental trigger run
(:mod:`lapse.score.trigger_run`, its state in :mod:`lapse.score.incremental`)."""
