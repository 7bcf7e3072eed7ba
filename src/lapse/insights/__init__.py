"""What the scores say beyond the nightly run: stickiness drivers
(:mod:`lapse.insights.drivers`) and the measured impact of messages
(:mod:`lapse.insights.impact`)."""
