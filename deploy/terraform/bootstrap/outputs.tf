output "state_bucket" {
  description = "Name of the state bucket."
  value       = aws_s3_bucket.state.bucket
}

output "backend_config" {
  description = "Contents for envs/production/backend.hcl."
  value = join("\n", compact([
    "bucket       = \"${aws_s3_bucket.state.bucket}\"",
    "key          = \"${var.state_key}\"",
    "region       = \"${var.region}\"",
    "encrypt      = true",
    var.create_lock_table ? "dynamodb_table = \"${aws_dynamodb_table.lock[0].name}\"" : "use_lockfile = true",
    "",
  ]))
}
