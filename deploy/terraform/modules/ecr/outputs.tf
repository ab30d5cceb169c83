output "repository_urls" {
  description = "Repository URL by name (<account>.dkr.ecr.<region>.amazonaws.com/<name>)."
  value       = { for name, repo in aws_ecr_repository.this : name => repo.repository_url }
}

output "repository_arns" {
  description = "Repository ARN by name."
  value       = { for name, repo in aws_ecr_repository.this : name => repo.arn }
}

output "registry" {
  description = "Registry host the repositories are in: what `docker login` and `visionloop images push --registry` take."
  value       = split("/", values(aws_ecr_repository.this)[0].repository_url)[0]
}
