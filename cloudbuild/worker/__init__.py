"""cloudbuild.worker"""
