"""The score jobs: records from a model (:mod:`lapse.score.records`), the nightly run
that delivers them (:mod:`lapse.score.run`, its delivery steps in
:mod:`lapse.score.steps`, shared with the Spark engine), and the incremental trigger run
(:mod:`lapse.score.trigger_run`, its state in :mod:`lapse.score.incremental`)."""
