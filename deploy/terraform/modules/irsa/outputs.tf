output "bucket_name" {
  description = "Name of the artifact bucket."
  value       = aws_s3_bucket.artifacts.bucket
}

output "bucket_arn" {
  description = "ARN of the artifact bucket."
  value       = aws_s3_bucket.artifacts.arn
}

output "role_arns" {
  description = "IAM role ARN by service account name."
  value       = { for name, role in aws_iam_role.this : name => role.arn }
}

output "service_account_annotations" {
  description = "Annotations to put on each Kubernetes service account (by name) so that its pods get the role."
  value       = { for name, role in aws_iam_role.this : name => { "eks.amazonaws.com/role-arn" = role.arn } }
}
