"""interceptors"""
