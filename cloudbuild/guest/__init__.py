"""cloudbuild.guest"""
