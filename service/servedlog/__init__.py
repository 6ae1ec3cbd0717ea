"""The served log's transport: the service's writer (Redis Streams) and the exporter to Parquet.

The record format is `ranker.servedlog`, shared with the trainer.
"""
