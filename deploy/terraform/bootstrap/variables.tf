variable "region" {
  description = "AWS region of the state bucket (the same as the cluster's keeps things simple)."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Name of the state bucket; null makes visionloop-tfstate-ACCOUNT_ID."
  type        = string
  default     = null
}

variable "create_lock_table" {
  description = "Also create a DynamoDB lock table, for Terraform older than 1.10 (newer ones lock with use_lockfile)."
  type        = bool
  default     = false
}

variable "state_key" {
  description = "Key of the production state in the bucket, written into the backend_config output."
  type        = string
  default     = "visionloop/production/terraform.tfstate"
}
