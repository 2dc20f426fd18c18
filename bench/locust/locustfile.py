"""The reference design's load test (its tests/load/locustfile.py), run by `python -m bench locust`.

The same two users, tasks, weights and waits as the reference. One change: the
credentials come from LOCUST_USERNAME / LOCUST_PASSWORD (default admin /
admin123 as in the reference), because the appliance has no default account;
the bench creates an admin with a random password and passes it here.
"""

import os
import random

from locust import HttpUser, between, task

USERNAME = os.environ.get("LOCUST_USERNAME", "admin")
PASSWORD = os.environ.get("LOCUST_PASSWORD", "admin123")


class APIUser(HttpUser):
    wait_time = between(1, 3)

    def on_start(self):
        """Authenticate user on start"""
        self.login()

    def login(self):
        """Login and store token"""
        response = self.client.post("/auth/login", json={"username": USERNAME, "password": PASSWORD})

        if response.status_code == 200:
            token = response.json()["data"]["access_token"]
            self.client.headers.update({"Authorization": f"Bearer {token}"})

    @task(3)
    def health_check(self):
        """Frequent health checks"""
        self.client.get("/health/ping")

    @task(2)
    def get_status(self):
        """Get API status"""
        self.client.get("/api/status")

    @task(2)
    def protected_endpoint(self):
        """Access protected endpoint"""
        self.client.get("/api/protected")

    @task(1)
    def submit_task(self):
        """Submit background task"""
        self.client.post("/tasks/submit", json={"task_type": "sample", "data": {"load_test": True, "user_id": random.randint(1, 1000)}})

    @task(1)
    def get_task_stats(self):
        """Get task statistics"""
        self.client.get("/tasks/stats")


class AdminUser(HttpUser):
    wait_time = between(2, 5)
    weight = 1  # Fewer admin users

    def on_start(self):
        response = self.client.post("/auth/login", json={"username": USERNAME, "password": PASSWORD})

        if response.status_code == 200:
            token = response.json()["data"]["access_token"]
            self.client.headers.update({"Authorization": f"Bearer {token}"})

    @task
    def get_metrics(self):
        """Admin metrics endpoint"""
        self.client.get("/api/metrics")

    @task
    def get_users(self):
        """List users"""
        self.client.get("/api/users")
