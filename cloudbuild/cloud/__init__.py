"""cloudbuild.cloud"""
