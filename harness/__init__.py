"""What the tests and the load tests share: a real server started on loopback, the uploads,
a throwaway Prometheus, and the one HTTP load client."""
