"""cloudbuild.disk"""
