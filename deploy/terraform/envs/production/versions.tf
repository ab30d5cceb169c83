terraform {
  # 1.10+: the S3 backend locks state with an S3 lock file (use_lockfile), no DynamoDB table needed
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.17"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.36"
    }
  }

  # Partial configuration: bucket, key, region and locking come from a file at init time,
  #   terraform init -backend-config=backend.hcl
  # (copy backend.hcl.example; the bucket is made by ../../bootstrap). See README.md.
  backend "s3" {}
}
