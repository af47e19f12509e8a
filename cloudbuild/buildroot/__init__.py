"""cloudbuild.buildroot"""
