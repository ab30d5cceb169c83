-- Run once by the postgres image's entrypoint (/docker-entrypoint-initdb.d), on an empty data volume only,
-- as POSTGRES_USER: the two databases of the laptop stack, owned by that user.
--   mlflow       MLflow's tracking store and model registry (mlflow server --backend-store-uri)
--   predictions  the prediction store that serve writes and monitor and loop read (monitor.store_url)
CREATE DATABASE mlflow;
CREATE DATABASE predictions;
