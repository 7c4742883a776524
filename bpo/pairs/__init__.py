"""Preference data in, optimized-prompt pairs out: the paper's step 1 (data construction).

``importers`` read public preference datasets into ``PreferenceRecord``s; ``filters`` and ``diversity`` drop
low-quality and near-duplicate instructions; ``construct`` holds the paper's prompts, the output parser, the
length-ratio and ``[protected`` filters and the context layouts; ``build`` runs the whole step as a resumable
batch over any ``Generator`` (an in-process engine, or the Celery optimizer workers); the results live in
Postgres (``bpo.store.pairs``), one decision per (record, constructor model, prompt version).
"""
