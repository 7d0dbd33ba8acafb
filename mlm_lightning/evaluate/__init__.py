"""`mlm-lightning evaluate`: did pre-training help? Each model fine-tuned (or probed) on the user's labelled data,
scored on its test split over several seeds (data.py: the rows; models.py: the classifiers; classifier.py: the
fine-tuning; probe.py: the linear probe; run.py: the loop; report.py: the table and the JSON file)."""
