terraform {
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }

  # Local state on purpose: this configuration makes the bucket every other state lives in. Keep its
  # terraform.tfstate safe (or move it into the bucket afterwards, see README.md).
}

provider "aws" {
  region = var.region

  default_tags {
    tags = { "app.kubernetes.io/part-of" = "visionloop", managed-by = "terraform" }
  }
}
